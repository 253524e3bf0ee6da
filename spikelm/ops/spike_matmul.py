"""Spike-sparse linear product for training: y = x W^T + b where x is mostly zeros (spikes), with its gradients.

    y = spike_matmul(x, weight, bias=None, max_density=MAX_DENSITY)

Of a linear layer's three products in a training step, two read its input: the forward (y = x W^T) and
the weight's gradient (dW = dy^T x). When x holds spikes, most of it is zero (a trained tiny SpikeLM:
~12 % of its linears' inputs are non-zero, ~35 % at initialisation), and both products need only the
non-zero entries: the C kernel (csrc/spike_matmul.c) lists them once per forward (CSR, 8 bytes per
non-zero: what the backward keeps instead of x), accumulates the matching weight rows for y, and for
dW the matching rows of dy, column by column. The third product, the input's gradient dy W, is dense
(every input's surrogate gradient needs it) and stays torch's matmul.

The kernel walks non-zeros at about a third of a dense matmul's rate per multiply-add, so it pays
below roughly a quarter of the inputs non-zero (benchmarks/bench_spike_matmul.py: crossovers of 24-32 %
by shape); above `max_density` (the fraction of x's entries that are non-zero, measured per call;
MAX_DENSITY = 0.25, the low end of those) the call runs torch's dense products. Backends noted for
ops.record_backends: ("spike_matmul", "c" | "dense"). The kernel runs for plain CPU float32 tensors
outside autocast; anything else (CUDA, bfloat16, autocast, torch.compile tracing, torch.func
transforms, tensor subclasses such as DTensor, no C compiler, SPIKELM_CPU_KERNEL=0) takes the dense
products.
Results equal the dense product's up to float32 rounding (a different order of the same sums), and
do not depend on the thread count. One difference: an exact zero input is skipped, so an inf or NaN
weight (or gradient entry) that the dense product would multiply by zero does not reach y (or dW); it
still reaches the input's gradient, which stays dense. `naive_spike_matmul` is the float64 reference.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .backends import note_backend
from .cbuild import CSRC, CLibrary

SOURCE = CSRC / "spike_matmul.c"
# above this fraction of non-zero inputs the dense products run (the walk costs ~3x a dense multiply-add; the
# crossovers measured by benchmarks/bench_spike_matmul.py lie at 24-32 % by shape)
MAX_DENSITY = 0.25


def _declare(lib: ctypes.CDLL) -> None:
    P, I64, I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.spike_matmul_count.argtypes = [P, I64, I64, I64, P, I]
    lib.spike_matmul_count.restype = I64
    lib.spike_matmul_csr.argtypes = [P, I64, I64, I64, P, P, P, I]
    lib.spike_matmul_forward.argtypes = [I64, I64, P, P, P, P, P, P, I]
    lib.spike_matmul_csc.argtypes = [I64, I64, P, P, P, P, P, P]
    lib.spike_matmul_dw.argtypes = [I64, I64, P, P, P, P, P, I]
    for name in ("spike_matmul_csr", "spike_matmul_forward", "spike_matmul_csc", "spike_matmul_dw"):
        getattr(lib, name).restype = None


LIBRARY = CLibrary("spike_matmul", [SOURCE], _declare)


def c_kernel_available() -> bool:
    """Whether the compiled kernel loads here (builds it on the first call)."""
    return LIBRARY.available()


def naive_spike_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The float64 reference: x W^T + b."""
    y = x.double() @ weight.double().t()
    return (y if bias is None else y + bias.double()).to(x.dtype)


def _functorch_active() -> bool:
    check = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(check and check())


def _kernel_can_run(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    # plain tensors only: a tensor subclass (DTensor under FSDP, ...) keeps its own dispatch, and torch.func
    # transforms (vmap, grad) need the dense ops' rules
    return (not _functorch_active() and type(x.detach()) is torch.Tensor and type(weight.detach()) is torch.Tensor
            and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32) and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling() and x.shape[-1] < 2 ** 31 and x.numel() // max(x.shape[-1], 1)
            < 2 ** 31 and LIBRARY.available())


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


class _SpikeMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, rowptr, nnz):
        lib = LIBRARY.load()
        R, I = x2.shape
        O = weight.shape[0]
        threads = torch.get_num_threads()
        col = torch.empty(nnz, dtype=torch.int32)
        val = torch.empty(nnz, dtype=torch.float32)
        lib.spike_matmul_csr(x2.data_ptr(), R, I, x2.stride(0), rowptr.data_ptr(), col.data_ptr(), val.data_ptr(),
                             threads)
        wT = weight.detach().t().contiguous()  # [I, O]: every input's weights contiguous
        b = None if bias is None else bias.detach().contiguous()
        y = torch.empty(R, O, dtype=torch.float32)
        lib.spike_matmul_forward(R, O, rowptr.data_ptr(), col.data_ptr(), val.data_ptr(), wT.data_ptr(), _ptr(b),
                                 y.data_ptr(), threads)
        if weight.requires_grad:
            ctx.save_for_backward(weight, rowptr, col, val)
        else:  # a frozen weight: only the input's gradient, dy W, is needed
            ctx.save_for_backward(weight, None, None, None)
        ctx.shape = (R, I)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        weight, rowptr, col, val = ctx.saved_tensors
        R, I = ctx.shape
        O = weight.shape[0]
        dy = dy.to(torch.float32).contiguous()
        dx = dy @ weight if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            lib = LIBRARY.load()
            nnz = val.numel()
            colptr = torch.empty(I + 1, dtype=torch.int64)
            row = torch.empty(nnz, dtype=torch.int32)
            cval = torch.empty(nnz, dtype=torch.float32)
            lib.spike_matmul_csc(R, I, rowptr.data_ptr(), col.data_ptr(), val.data_ptr(), colptr.data_ptr(),
                                 row.data_ptr(), cval.data_ptr())
            dwT = torch.empty(I, O, dtype=torch.float32)
            lib.spike_matmul_dw(I, O, colptr.data_ptr(), row.data_ptr(), cval.data_ptr(), dy.data_ptr(),
                                dwT.data_ptr(), torch.get_num_threads())
            dw = dwT.t().contiguous()
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None


def spike_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 max_density: float = MAX_DENSITY) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., I] holding mostly zeros, differentiable: the sparse kernel where it
    can run and at most max_density of x is non-zero, else the dense product (see the module doc)."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"spike_matmul: x's last dimension ({x.shape[-1]}) must equal the weight's in_features "
                         f"({weight.shape[-1]}); weight {tuple(weight.shape)}")
    if x.numel() and max_density > 0 and _kernel_can_run(x, weight, bias):
        x2 = x.reshape(-1, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        R, I = x2.shape
        rowptr = torch.empty(R + 1, dtype=torch.int64)
        nnz = LIBRARY.load().spike_matmul_count(x2.data_ptr(), R, I, x2.stride(0), rowptr.data_ptr(),
                                                torch.get_num_threads())
        if nnz <= max_density * R * I:
            note_backend("spike_matmul", "c")
            y = _SpikeMatmul.apply(x2, weight, bias, rowptr, nnz)
            return y.view(*x.shape[:-1], weight.shape[0])
    note_backend("spike_matmul", "dense")
    return F.linear(x, weight, bias)
