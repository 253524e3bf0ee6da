"""ops.scan: every backend against the naive float64 oracle, forward and backward."""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spikelm.ops import naive_scan, record_backends, scan
from spikelm.ops.torch_scan import chunked_scan_forward, serial_scan_forward

CPU_BACKENDS = ["torch", "naive"]


def _inputs(B, T, D, dtype=torch.float64, init=True):
    x = torch.randn(B, T, D, dtype=dtype)
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, D, dtype=dtype)) * 3  # log-decays <= 0
    h0 = torch.randn(B, D, dtype=dtype) if init else None
    return x, g, h0


def _grads(backend, x, g, h0, cu=None, dtype=None):
    """Run scan on leaf copies (cast to dtype) and return outputs plus gradients in float64."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() if t is not None else None for t in (x, g, h0)]
    with record_backends() as ran:
        h, last = scan(*leaves, output_final_state=True, cu_seqlens=cu, backend=backend)
    assert ran == [("scan", backend)]
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(h.shape, generator=gen, dtype=torch.float64)
    wl = torch.randn(last.shape, generator=gen, dtype=torch.float64)
    loss = (h.double() * w).sum() + (last.double() * wl).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return [h.double(), last.double()] + [gr.double() for gr in grads]


def _oracle(x, g, h0):
    return _grads("naive", x, g, h0, dtype=torch.float64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("B,T,D", [(1, 1, 1), (2, 1, 3), (2, 7, 5), (3, 64, 17), (1, 333, 8), (2, 1000, 3)])
@pytest.mark.parametrize("init", [True, False])
def test_matches_oracle_fp32(backend, B, T, D, init):
    x, g, h0 = _inputs(B, T, D, init=init)
    want = _oracle(x, g, h0)
    got = _grads(backend, x, g, h0, dtype=torch.float32)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("T", [1, 100, 4097])
def test_torch_backend_exact_in_float64(T):
    x, g, h0 = _inputs(2, T, 3)
    for a, b in zip(_grads("torch", x, g, h0), _oracle(x, g, h0)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_bf16_inputs_accumulate_in_float32():
    x, g, h0 = _inputs(2, 300, 16)
    h, last = scan(x.bfloat16(), g.bfloat16(), h0.float(), output_final_state=True, backend="torch")
    assert h.dtype == torch.bfloat16 and last.dtype == torch.float32
    want, want_last = naive_scan(x.bfloat16().double(), g.bfloat16().double(), h0.float().double())
    torch.testing.assert_close(h.double(), want, atol=5e-2, rtol=1e-2)  # bf16 output rounding
    torch.testing.assert_close(last.double(), want_last, atol=1e-5, rtol=1e-5)  # float32 state
    # gradients flow back in the input dtype
    xb = x.bfloat16().requires_grad_()
    scan(xb, g.bfloat16(), backend="torch")[0].float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()


def test_non_contiguous_inputs():
    x, g, h0 = _inputs(3, 40, 6)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    gt = g[:, :, list(range(6))]
    assert not xt.is_contiguous()
    for a, b in zip(_grads("torch", xt, gt, h0), _oracle(x, g, h0)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_final_state_gradient_only():
    x, g, h0 = _inputs(2, 50, 4)
    xs = x.clone().requires_grad_()
    _, last = scan(xs, g, h0, output_final_state=True, backend="torch")
    last.sum().backward()
    xo = x.clone().requires_grad_()
    naive_scan(xo, g, h0)[1].sum().backward()
    torch.testing.assert_close(xs.grad, xo.grad)


def test_long_sequence_with_hard_resets_stays_finite():
    # decays at the floor (exp(-20)) and near 1 over 20k steps: no NaN, matches the oracle
    T = 20000
    x = torch.randn(1, T, 4, dtype=torch.float64)
    g = torch.where(torch.rand(1, T, 4) < 0.5, -20.0, -1e-4).double()
    h, _ = scan(x.float(), g.float(), backend="torch")
    want, _ = naive_scan(x, g)
    assert torch.isfinite(h).all()
    torch.testing.assert_close(h.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lengths", [[5], [3, 0, 7, 1], [1, 1, 1], [40, 200, 13]])
def test_packed_equals_separate(backend, lengths):
    D = 5
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()))
    T = int(cu[-1])
    x, g, _ = _inputs(1, T, D)
    h0 = torch.randn(len(lengths), D, dtype=torch.float64)
    got = _grads(backend, x, g, h0, cu=cu, dtype=torch.float32)
    h_p, last_p, dx_p, dg_p, dh0_p = got
    gen = torch.Generator().manual_seed(1)
    w = torch.randn((1, T, D), generator=gen, dtype=torch.float64)
    wl = torch.randn((len(lengths), D), generator=gen, dtype=torch.float64)
    for n, (s, e) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        xs, gs, hs = (t.clone().requires_grad_() for t in (x[:, s:e], g[:, s:e], h0[n : n + 1]))
        h, last = naive_scan(xs, gs, hs)
        loss = (h * w[:, s:e]).sum() + (last * wl[n : n + 1]).sum()
        dxs, dgs, dhs = torch.autograd.grad(loss, (xs, gs, hs), allow_unused=True)
        torch.testing.assert_close(h_p[:, s:e], h, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(last_p[n], last[0], atol=2e-5, rtol=2e-5)
        if e > s:
            torch.testing.assert_close(dx_p[:, s:e], dxs, atol=2e-5, rtol=2e-5)
            torch.testing.assert_close(dg_p[:, s:e], dgs, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(dh0_p[n], dhs[0], atol=2e-5, rtol=2e-5)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 300), D=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_chunked_form_matches_serial_loop(B, T, D, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D, generator=gen, dtype=torch.float64)
    g = -torch.rand(B, T, D, generator=gen, dtype=torch.float64) * 25  # includes near-hard resets
    h0 = torch.randn(B, D, generator=gen, dtype=torch.float64)
    h, last = chunked_scan_forward(x, g, h0)
    h_ref, last_ref = serial_scan_forward(x, g, h0)
    torch.testing.assert_close(h, h_ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(last, last_ref, atol=1e-12, rtol=1e-10)


def test_auto_uses_torch_on_cpu():
    x, g, h0 = _inputs(1, 10, 2)
    with record_backends() as ran:
        auto = scan(x, g, h0, backend="auto")[0]
    assert ran == [("scan", "torch")]  # the backend that ran, not only its values
    torch.testing.assert_close(auto, scan(x, g, h0, backend="torch")[0])
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(RuntimeError, match="backend='triton' needs Triton and a CUDA device"):
            scan(x, g, h0, backend="triton")


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(x=torch.randn(2, 3)), ValueError, "x must have shape"),
        (dict(g=torch.randn(2, 4, 3)), ValueError, "same shape"),
        (dict(x=torch.ones(2, 3, 3, dtype=torch.long)), TypeError, "x must be a floating"),
        (dict(initial_state=torch.randn(3, 3)), ValueError, "initial_state must have shape"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(cu_seqlens=torch.tensor([0, 3])), ValueError, "batch size must be 1"),
    ],
)
def test_bad_input(kwargs, err, match):
    args = dict(x=torch.randn(2, 3, 3), g=torch.randn(2, 3, 3))
    args.update(kwargs)
    with pytest.raises(err, match=match):
        scan(**args)


def test_bad_cu_seqlens():
    x = torch.randn(1, 6, 2)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to T=6"):
        scan(x, x, cu_seqlens=torch.tensor([0, 4, 2, 6]))
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to T=6"):
        scan(x, x, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"initial_state must have shape \[N, D\]"):
        scan(x, x, initial_state=torch.zeros(1, 2), cu_seqlens=torch.tensor([0, 2, 6]))


@pytest.mark.parametrize("B,T,D,block", [(2, 1000, 64, 64 * 128), (1, 777, 33, 33 * 64), (3, 129, 5, 15 * 64), (1, 300, 7, 7 * 65)])
def test_cache_blocked_torch_path_matches_oracle(monkeypatch, B, T, D, block):
    # many cache blocks with remainders, hard resets (g = -inf) included: forward and all gradients exact in float64
    from spikelm.ops import torch_scan as ts

    monkeypatch.setattr(ts, "_BLOCK_ELEMENTS", block)
    assert ts._sizes(T, B * D)[0] < T
    x, g, h0 = _inputs(B, T, D)
    g = torch.where(torch.rand(B, T, D, generator=torch.Generator().manual_seed(3)) < 0.05, float("-inf"), g)
    got, want = _grads("torch", x, g, h0), _oracle(x, g, h0)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
