"""Triton kernels (ops/triton_scan.py, ops/dsn/triton_backend.py) against the torch backends and the float64 references.

Kernel tests (class TestKernels) run on CUDA when there is a GPU, else on the CPU under the Triton
interpreter. TRITON_INTERPRET=1 must be set before the kernels' module is first imported (triton.jit
decides at decoration time), and other test modules may import it earlier in this process, so
without a GPU the class is not collected here and `test_kernels_under_interpreter` runs it in a
fresh python with the variable set. Shapes are tiny: the interpreter runs every tile in numpy.
The ops' dispatch (no silent fallback off CUDA) and an sm_90 build of the kernels (ahead of time,
no GPU needed) run here directly; op registration (opcheck) and torch.compile of the DSN kernels
run with the kernels, in TestKernels.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from spikelm.neurons import DSN
from spikelm.ops import naive_scan, record_backends, scan
from spikelm.ops.dsn import DSNState, dsn, dsn_step, naive_dsn, triton_backend

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if CUDA else "cpu"
KERNELS_HERE = CUDA or INTERPRETED  # can this process run the Triton kernels?


@pytest.fixture
def kernels():
    pytest.importorskip("triton")
    from spikelm.ops import triton_scan  # noqa: PLC0415

    assert triton_scan.is_available()
    return triton_scan


@pytest.mark.skipif(KERNELS_HERE, reason="the kernel tests already run in this process")
def test_kernels_under_interpreter():
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", os.path.abspath(__file__) + "::TestKernels"]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"interpreter run failed:\n{r.stdout[-8000:]}\n{r.stderr[-4000:]}"
    assert " passed" in r.stdout, r.stdout[-2000:]


# ---------------------------------------------------------------------------------------------
# scan
# ---------------------------------------------------------------------------------------------
def _inputs(B, T, D, init=True, n_init=None):
    x = torch.randn(B, T, D, dtype=torch.float64)
    g = F.logsigmoid(torch.randn(B, T, D, dtype=torch.float64)) * 3
    h0 = torch.randn(n_init or B, D, dtype=torch.float64) if init else None
    return x, g, h0


def _run(fn, x, g, h0, dtype, device=DEV):
    """Outputs and gradients (float64, CPU) of a weighted loss on h and h_last."""
    leaves = [None if t is None else t.detach().to(device=device, dtype=dtype).requires_grad_() for t in (x, g, h0)]
    h, last = fn(*leaves)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(h.shape, generator=gen, dtype=torch.float64)
    wl = torch.randn(last.shape, generator=gen, dtype=torch.float64)
    loss = (h.double().cpu() * w).sum() + (last.double().cpu() * wl).sum()
    used = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(loss, used, allow_unused=True)  # T = 0: x and g take no part
    return [h.double().cpu(), last.double().cpu()] + [
        (torch.zeros_like(t) if gr is None else gr).double().cpu() for t, gr in zip(used, grads)]


def _close(got, want, tol):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"output/grad #{i}: {m}")

# ---------------------------------------------------------------------------------------------
# fused DSN neuron (ops.dsn, backend "triton")
# ---------------------------------------------------------------------------------------------
def _dsn_inputs(B, T, C, k=4, init=True, n_init=None, history=False):
    x = torch.randn(B, T, C, dtype=torch.float64) * 3  # membranes across the whole 0..N range and outside
    w = torch.randn(C, k, dtype=torch.float64)
    b = torch.randn(C, dtype=torch.float64) * 3  # decays from hard reset (floor) to long memory
    w[0], b[0] = 0.0, -40.0  # a channel pinned at the log-decay floor (no gradient through the clamp)
    h0 = torch.randn(n_init or B, C, dtype=torch.float64) if init else None
    hist = torch.randn(B, k - 1, C, dtype=torch.float64) if history else None
    return x, w, b, h0, hist


def _dsn_run(fn, inputs, x_dtype, device):
    """Spikes, final membrane and the gradients of every given input, as float64 on the CPU, of a weighted loss."""
    x, w, b, h0, hist = inputs
    state_dtype = torch.float64 if x_dtype == torch.float64 else torch.float32  # parameters and membrane
    leaves = [x.to(device, x_dtype), w.to(device, state_dtype), b.to(device, state_dtype),
              None if h0 is None else h0.to(device, state_dtype), None if hist is None else hist.to(device, x_dtype)]
    leaves = [None if t is None else t.requires_grad_() for t in leaves]
    s, last = fn(*leaves)
    gen = torch.Generator().manual_seed(2)
    wgt = torch.randn(s.shape, generator=gen, dtype=torch.float64)
    wl = torch.randn(last.shape, generator=gen, dtype=torch.float64)
    loss = (s.double().cpu() * wgt).sum() + (last.double().cpu() * wl).sum()
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return [s.double().cpu(), last.double().cpu()] + [gr.double().cpu() for gr in grads]


def _dsn_oracle(inputs, cu=None, tau=0.25, N=4, surrogate="rect"):
    def fn(x_, w_, b_, h_, hist_):
        spikes, _, last, _ = naive_dsn(x_, w_, b_, tau, N, surrogate, history=hist_, initial_membrane=h_,
                                       cu_seqlens=cu)
        return spikes, last
    return _dsn_run(fn, inputs, torch.float64, "cpu")


def _dsn_op(backend, inputs, cu=None, tau=0.25, N=4, x_dtype=torch.float32, device="cpu", surrogate="rect"):
    """ops.dsn on `backend`, asserting that it is the backend that ran."""
    def fn(x_, w_, b_, h_, hist_):
        state = None if h_ is None and hist_ is None else DSNState(h_, hist_)
        with record_backends() as ran:
            out = dsn(x_, w_, b_, tau, N, surrogate, initial_state=state, cu_seqlens=None if cu is None else cu.to(x_.device),
                      output_final_state=True, backend=backend)
        assert ran == [("dsn", backend)]
        return out.spikes, out.final_state.membrane
    return _dsn_run(fn, inputs, x_dtype, device)


def _dsn_kernel(inputs, cu=None, tau=0.25, N=4, chunk=None, x_dtype=torch.float32, surrogate="rect"):
    """The Triton backend directly, with a forced chunk length (None: through ops.dsn)."""
    if chunk is None:
        return _dsn_op("triton", inputs, cu, tau, N, x_dtype, DEV, surrogate)

    def fn(x_, w_, b_, h_, hist_):
        s, last, _ = triton_backend.run(x_, w_, b_, hist_, h_, None if cu is None else cu.to(DEV), tau, N, surrogate,
                                        2.0, False, chunk_len=chunk)
        return s, last
    return _dsn_run(fn, inputs, x_dtype, DEV)


def _assert_spikes_match(got, want, allowed=0.002):
    # spikes are a staircase: a membrane within rounding of a threshold may flip; allow a few such
    diff = (got[0] != want[0]).double().mean().item()
    assert diff <= allowed, f"{diff:.4%} of spikes differ"
    for i, (a, b) in enumerate(zip(got[1:], want[1:])):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"state/grad #{i + 1}: {m}")


def _check_dsn_module_triton_vs_torch(mode):
    """DSN(backend="triton") against DSN(backend="torch") on this device: spikes, states, gradients."""
    torch.manual_seed(0)
    m = DSN(6).to(DEV)
    B, T = (1, 11) if mode == "packed" else (2, 9)
    x = (torch.randn(B, T, 6, device=DEV) * 2).requires_grad_()
    kwargs = dict(return_state=True)
    if mode == "packed":
        kwargs["cu_seqlens"] = torch.tensor([0, 4, 4, 11], device=DEV)
    elif mode == "state":
        with torch.no_grad():
            prev = m(torch.randn(B, 5, 6, device=DEV) * 2, return_state=True)[1]
        kwargs["state"] = type(prev)(prev.membrane.clone().requires_grad_(), prev.conv)  # d(initial membrane) too
    results = []
    for backend in ("torch", "triton"):
        m.backend = backend
        x.grad = None
        m.zero_grad()
        if mode == "state":
            kwargs["state"].membrane.grad = None
        with record_backends() as ran:
            s, st = m(x, **kwargs)
        assert ran == [("dsn", backend)]
        ((s * torch.arange(T, device=DEV)[None, :, None]).sum() + st.membrane.sum()).backward()
        grads = [x.grad.clone(), m.conv_weight.grad.clone(), m.conv_bias.grad.clone()]
        if mode == "state":
            grads.append(kwargs["state"].membrane.grad.clone())
        results.append([s, st.membrane, st.conv] + grads)
    assert (results[0][0] != results[1][0]).float().mean() <= 0.01
    for a, b in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _check_step_against_reference(k, device):
    """A loop of dsn_step(backend="triton") == the torch step and the float64 reference, state carried."""
    torch.manual_seed(0)
    B, C, T = 3, 37, 6
    m = DSN(C, kernel_size=k).to(device)
    xs = torch.randn(B, T, C, device=device) * 3
    st_kernel = st_torch = None
    outs = []
    with torch.no_grad(), record_backends() as ran:
        for t in range(T):
            s, st_kernel = dsn_step(xs[:, t], m.conv_weight, m.conv_bias, m.tau, m.max_spike, state=st_kernel,
                                    backend="triton")
            s_torch, st_torch = dsn_step(xs[:, t], m.conv_weight, m.conv_bias, m.tau, m.max_spike, state=st_torch,
                                         backend="torch")
            assert (s != s_torch).float().mean() <= 0.01
            torch.testing.assert_close(st_kernel.membrane, st_torch.membrane, atol=1e-5, rtol=1e-5)
            assert torch.equal(st_kernel.conv, st_torch.conv)
            outs.append(s)
    assert ran == [("dsn_step", "triton"), ("dsn_step", "torch")] * T
    want, _, want_last, want_conv = naive_dsn(xs.cpu(), m.conv_weight.detach().cpu(), m.conv_bias.detach().cpu(),
                                              m.tau, m.max_spike)
    assert (torch.stack(outs, 1).cpu().double() != want).float().mean() <= 0.01
    torch.testing.assert_close(st_kernel.membrane.cpu().double(), want_last, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st_kernel.conv.cpu().double(), want_conv)


def test_triton_backend_is_refused_where_it_cannot_run():
    # off CUDA without the interpreter: an explicit backend="triton" is an error, never a fallback
    if KERNELS_HERE:
        pytest.skip("here the Triton kernels run")
    x = torch.randn(1, 4, 3)
    w, b = torch.randn(3, 4), torch.randn(3)
    with pytest.raises(ValueError, match="backend='triton' cannot run this call: it needs Triton and a CUDA tensor"):
        dsn(x, w, b, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' cannot run this call: it needs Triton and a CUDA tensor"):
        dsn_step(x[:, 0], w, b, backend="triton")
    with record_backends() as ran:
        dsn(x, w, b)
        dsn_step(x[:, 0], w, b)
    assert ran[0][1] in ("c", "torch") and ran[1] == ("dsn_step", "torch")


def test_step_bad_arguments():
    x = torch.randn(2, 5)
    w, b = torch.randn(5, 4), torch.randn(5)
    with pytest.raises(ValueError, match="state shapes must be membrane"):
        dsn_step(x, w, b, state=DSNState(torch.zeros(2, 5), torch.zeros(2, 2, 5)))
    with pytest.raises(ValueError, match=r"x must have shape \[B, C\]"):
        dsn_step(x[None], w, b)


def test_fused_bad_arguments():
    with pytest.raises(ValueError, match=r"weight must have shape \[C=4"):
        dsn(torch.randn(1, 3, 4), torch.randn(2, 4), torch.randn(4))
    with pytest.raises(ValueError, match="state shapes must be membrane"):
        dsn(torch.randn(2, 3, 2), torch.randn(2, 4), torch.randn(2), initial_state=DSNState(torch.zeros(1, 2), None))


def test_step_compiles_without_graph_breaks():
    # a decode loop of dsn_step (the torch step here) traces as one graph
    torch._dynamo.reset()
    m = DSN(8)
    w, b = m.conv_weight.detach(), m.conv_bias.detach()

    def decode(xs, state):
        out = []
        for t in range(xs.shape[1]):
            s, state = dsn_step(xs[:, t], w, b, 0.25, 4, state=state)
            out.append(s)
        return torch.stack(out, 1), state

    xs = torch.randn(2, 5, 8) * 3
    compiled = torch.compile(decode, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break is an error
    got, got_state = compiled(xs, m.initial_state(2))
    want, want_state = decode(xs, m.initial_state(2))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_state.membrane, want_state.membrane)
    torch.testing.assert_close(got_state.conv, want_state.conv)


def _compile_for_sm90(fn, signature, constexprs, num_warps=1):
    """Ahead-of-time compile a @triton.jit kernel to an H100 cubin (ptxas included), no GPU needed."""
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415
    import triton  # noqa: PLC0415

    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def test_kernels_compile_for_h100_without_a_gpu():
    # the interpreter runs the kernels' Python, not Triton's compiler: compile the main variants for
    # sm_90 so that a type or lowering error shows up here, not first on a lent GPU
    pytest.importorskip("triton")
    if CUDA or INTERPRETED:
        pytest.skip("on a GPU the kernel tests compile them for real; the interpreter has no compiler")
    import triton.language as tl  # noqa: PLC0415

    from spikelm.ops import triton_scan as ts  # noqa: PLC0415

    scalars = {"D": "i32", "max_chunks": "i32", "chunk_len": "i32", "tau": "fp32", "max_spike": "i32", "sa": "fp32"}
    for mode, rev, io, acc in [(1, False, "bf16", tl.float32), (1, True, "bf16", tl.float32),
                               (0, True, "fp64", tl.float64)]:
        st = "fp64" if acc == tl.float64 else "fp32"
        # 2 rows: same code, quicker build; the DSN backward with the atan surrogate (the rect one is a subset)
        base = dict(MODE=mode, SURROGATE=int(mode == 1 and rev), REVERSE=rev, ACC=acc, BLOCK_D=128, ROWS=2)
        out_sig = {"U": "*" + io, "G": "*" + st, "H": "*" + st, "H0": "*" + st, "X": "*" + io, "INIT": "*" + st,
                   "START": "*" + st, "CU": "*i64", "OUT": "*" + io, "OUT2": "*" + io, "FINAL": "*" + st, **scalars}
        _compile_for_sm90(ts._chunk_output_kernel, out_sig, dict(base, FROM_START=True, HAS_INIT=True, HAS_H0=rev,
                                                                  WRITE_OUT=True, WRITE_OUT2=True))
    _compile_for_sm90(ts._chunk_summary_kernel, {"U": "*bf16", "G": "*fp32", "H": "*fp32", "CU": "*i64", "E": "*fp32",
                                                 "A": "*fp32", **scalars},
                      dict(MODE=1, SURROGATE=1, REVERSE=True, ACC=tl.float32, BLOCK_D=128, ROWS=2))
    _compile_for_sm90(ts._chunk_carry_kernel, {"INIT": "*fp32", "CU": "*i64", "E": "*fp32", "A": "*fp32",
                                               "START": "*fp32", "D": "i32", "max_chunks": "i32", "chunk_len": "i32"},
                      dict(HAS_INIT=True, REVERSE=False, ACC=tl.float32, BLOCK_D=128))
    _compile_for_sm90(triton_backend._dsn_step_kernel, {"X": "*bf16", "CONV": "*bf16", "MEM": "*fp32", "W": "*fp32",
                                                        "BIAS": "*fp32", "S": "*bf16", "CONV_OUT": "*bf16",
                                                        "MEM_OUT": "*fp32", "C": "i32", "tau": "fp32",
                                                        "max_spike": "fp32"}, dict(K=4, BLOCK_C=1024), num_warps=8)


def test_is_available_never_raises_without_triton(monkeypatch):
    from spikelm.ops import triton_scan  # noqa: PLC0415

    monkeypatch.setattr(triton_scan, "triton", None)
    assert triton_scan.is_available() is False


class TestKernels:
    """Every Triton kernel against its torch path and the oracle; collected only where the kernels can run."""

    __test__ = KERNELS_HERE  # elsewhere test_kernels_under_interpreter runs this class in a fresh process

    @pytest.mark.parametrize("B,T,D,chunk,init", [
        (1, 1, 1, None, True), (2, 13, 5, None, True), (2, 13, 5, 4, True), (1, 20, 37, 3, False),
        (1, 5, 130, 2, True),  # two channel blocks, masked tail
    ])
    def test_kernel_scan_matches_torch_and_oracle(self, kernels, B, T, D, chunk, init):
        x, g, h0 = _inputs(B, T, D, init)
        want = _run(lambda *a: scan(*a, output_final_state=True, backend="naive"), x, g, h0, torch.float64, "cpu")
        torch_path = _run(lambda *a: scan(*a, output_final_state=True, backend="torch"), x, g, h0, torch.float32, "cpu")
        got = _run(lambda x_, g_, h_: kernels.triton_scan(x_, g_, h_, None, chunk), x, g, h0, torch.float32)
        _close(got, want, 2e-5)
        _close(torch_path, want, 2e-5)
        if chunk is None:  # ops.scan's dispatch to this backend
            via_scan = _run(lambda *a: scan(*a, output_final_state=True, backend="triton"), x, g, h0, torch.float32)
            _close(via_scan, want, 2e-5)

    @pytest.mark.parametrize("chunk", [None, 3])
    def test_kernel_scan_float64_is_exact(self, kernels, chunk):
        x, g, h0 = _inputs(1, 10, 4)
        want = _run(lambda *a: naive_scan(*a), x, g, h0, torch.float64, "cpu")
        got = _run(lambda x_, g_, h_: kernels.triton_scan(x_, g_, h_, None, chunk), x, g, h0, torch.float64)
        _close(got, want, 1e-12)

    def test_kernel_scan_final_state_gradient_only(self, kernels):
        x, g, h0 = _inputs(2, 10, 4)
        xs = x.float().to(DEV).requires_grad_()
        hs = h0.float().to(DEV).requires_grad_()
        _, last = kernels.triton_scan(xs, g.float().to(DEV), hs, None, 3)
        last.sum().backward()
        xo, ho = x.clone().requires_grad_(), h0.clone().requires_grad_()
        naive_scan(xo, g, ho)[1].sum().backward()
        torch.testing.assert_close(xs.grad.double().cpu(), xo.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hs.grad.double().cpu(), ho.grad, atol=1e-5, rtol=1e-5)

    @pytest.mark.parametrize("chunk", [None, 2])
    @pytest.mark.parametrize("lengths", [[3, 0, 7, 1], [0], [5, 0]])
    def test_kernel_scan_packed_sequences(self, kernels, lengths, chunk):
        D = 3
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
        T = int(cu[-1])
        x, g, h0 = _inputs(1, T, D, n_init=len(lengths))
        fn = lambda x_, g_, h_: kernels.triton_scan(x_, g_, h_, cu.to(x_.device), chunk)  # noqa: E731
        got = _run(fn, x, g, h0, torch.float32)
        want = _run(lambda *a: scan(*a, output_final_state=True, cu_seqlens=cu, backend="naive"), x, g, h0,
                    torch.float64, "cpu")
        torch_path = _run(lambda *a: scan(*a, output_final_state=True, cu_seqlens=cu, backend="torch"), x, g, h0,
                          torch.float32, "cpu")
        _close(got, want, 2e-5)
        _close(torch_path, want, 2e-5)

    def test_kernel_scan_bf16_inputs_accumulate_in_float32(self, kernels):
        x, g, h0 = _inputs(1, 20, 8)
        h, last = scan(x.bfloat16().to(DEV), g.bfloat16().to(DEV), h0.float().to(DEV), output_final_state=True,
                       backend="triton")
        assert h.dtype == torch.bfloat16 and last.dtype == torch.float32
        want, want_last = naive_scan(x.bfloat16().double(), g.bfloat16().double(), h0.float().double())
        torch.testing.assert_close(h.double().cpu(), want, atol=5e-2, rtol=1e-2)  # bf16 output rounding
        torch.testing.assert_close(last.double().cpu(), want_last, atol=1e-5, rtol=1e-5)  # float32 state
        xb = x.bfloat16().to(DEV).requires_grad_()
        scan(xb, g.bfloat16().to(DEV), backend="triton")[0].float().sum().backward()
        assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()

    def test_kernel_scan_hard_resets_stay_finite(self, kernels):
        # decays at the floor, exactly 0 (g = -inf) and near 1, over chunks: no NaN, matches the oracle
        T, D = 30, 3
        x = torch.randn(1, T, D, dtype=torch.float64)
        u = torch.rand(1, T, D)
        g = torch.where(u < 0.3, -20.0, torch.where(u < 0.4, float("-inf"), -1e-4)).double()
        got = _run(lambda x_, g_, h_: kernels.triton_scan(x_, g_, h_, None, 7), x, g, None, torch.float32)
        want = _run(lambda *a: naive_scan(*a), x, g, None, torch.float64, "cpu")
        for t in got:
            assert torch.isfinite(t).all()
        _close(got, want, 1e-4)

    def test_kernel_scan_64bit_offsets(self, kernels):
        # T*D beyond 2^31 elements: every row offset must be formed in int64 (about 26 GB of GPU memory)
        if not CUDA or torch.cuda.get_device_properties(0).total_memory < 40e9:
            pytest.skip("needs a CUDA device with 40 GB: 2^31 float32 elements per tensor")
        T, D = (1 << 21) + 3, 1024
        x = torch.ones(1, T, D, device="cuda")
        g = torch.full((1, T, D), math.log(0.5), device="cuda")
        with torch.no_grad():
            h, last = kernels.triton_scan(x, g, None, None)
        # h_t = 2 - 2^-t (to float32 rounding of exp): the rows past 2^31 elements must be written too
        two = torch.full((3, D), 2.0, device="cuda")
        torch.testing.assert_close(h[0, -3:], two, atol=1e-5, rtol=0)
        torch.testing.assert_close(last[0], two[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(h[0, :2, -1].cpu(), torch.tensor([1.0, 1.5]), atol=1e-6, rtol=0)
        del x, g, h

    @pytest.mark.parametrize("B,T,C,chunk,init,tau,N,surrogate", [
        (2, 11, 5, None, True, 0.25, 4, "rect"), (2, 11, 5, 3, True, 0.25, 4, "rect"),
        (1, 9, 20, 4, False, 0.5, 1, "atan"), (2, 11, 5, None, True, 0.25, 3, "atan"),
    ])
    def test_kernel_dsn_fused_matches_torch_and_oracle(self, kernels, B, T, C, chunk, init, tau, N, surrogate):
        inputs = _dsn_inputs(B, T, C, init=init, history=init)
        want = _dsn_oracle(inputs, tau=tau, N=N, surrogate=surrogate)
        _assert_spikes_match(_dsn_kernel(inputs, tau=tau, N=N, chunk=chunk, surrogate=surrogate), want)
        _assert_spikes_match(_dsn_op("torch", inputs, tau=tau, N=N, surrogate=surrogate), want)

    @pytest.mark.parametrize("chunk,surrogate", [(None, "rect"), (2, "rect"), (2, "atan")])
    def test_kernel_dsn_fused_packed(self, kernels, chunk, surrogate):
        lengths = [4, 0, 6, 1]
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
        inputs = _dsn_inputs(1, int(cu[-1]), 3, n_init=len(lengths))
        want = _dsn_oracle(inputs, cu, surrogate=surrogate)
        _assert_spikes_match(_dsn_kernel(inputs, cu, chunk=chunk, surrogate=surrogate), want)
        _assert_spikes_match(_dsn_op("torch", inputs, cu, surrogate=surrogate), want)

    def test_kernel_dsn_fused_bf16_matches_unfused(self, kernels):
        # bf16 X: the kernel must match the torch backend on the same bf16 input (float32 inside)
        inputs = _dsn_inputs(1, 12, 4)
        got = _dsn_kernel(inputs, chunk=5, x_dtype=torch.bfloat16)
        want = _dsn_op("torch", inputs, x_dtype=torch.bfloat16)
        assert (got[0] != want[0]).double().mean().item() <= 0.01
        torch.testing.assert_close(got[1], want[1], atol=1e-4, rtol=1e-4)  # float32 final state
        for a, b in zip(got[2:], want[2:]):
            torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)  # bf16 gradients for X

    def test_kernel_dsn_fused_spikes_only_gradient(self, kernels):
        x, w, b, _, _ = _dsn_inputs(1, 8, 4)
        xs = x.float().to(DEV).requires_grad_()
        triton_backend.run(xs, w.float().to(DEV), b.float().to(DEV), None, None, None, 0.25, 4, "rect", 2.0, False,
                           chunk_len=3)[0].sum().backward()
        xo = x.requires_grad_()
        naive_dsn(xo, w, b, 0.25, 4)[0].sum().backward()
        torch.testing.assert_close(xs.grad.double().cpu(), xo.grad, atol=1e-4, rtol=1e-4)

    def test_kernel_dsn_module_uses_fused_kernel_on_cuda(self, kernels):
        # DSN(backend="triton") runs the fused kernel (asserted, not only its values), "auto" picks it on CUDA
        torch.manual_seed(0)
        T = 300 if CUDA else 40  # the interpreter runs every tile in numpy
        fused, plain = DSN(16, backend="triton").to(DEV), DSN(16, backend="torch").to(DEV)
        plain.load_state_dict(fused.state_dict())
        x = (torch.randn(2, T, 16, device=DEV) * 2).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        with record_backends() as ran:
            s1, st1 = fused(x, return_state=True)
            s2, st2 = plain(x2, return_state=True)
            if CUDA:
                DSN(16).cuda()(x2)
        assert ran == [("dsn", "triton"), ("dsn", "torch")] + ([("dsn", "triton")] if CUDA else [])
        assert (s1 != s2).float().mean() < 1e-3
        torch.testing.assert_close(st1.membrane, st2.membrane, atol=1e-4, rtol=1e-4)
        (s1.sum() + st1.membrane.sum()).backward()
        (s2.sum() + st2.membrane.sum()).backward()
        torch.testing.assert_close(x.grad, x2.grad, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(fused.conv_weight.grad, plain.conv_weight.grad, atol=1e-2, rtol=1e-3)

    @pytest.mark.parametrize("mode", ["plain", "state", "packed"])
    def test_kernel_dsn_module_fused_branch(self, kernels, mode):
        _check_dsn_module_triton_vs_torch(mode)

    @pytest.mark.parametrize("k", [4, 1])
    def test_kernel_step_matches_module_step(self, kernels, k):
        _check_step_against_reference(k, DEV)

    def test_kernel_ops_pass_opcheck(self, kernels):
        x, w, b, h0, _ = (None if t is None else t.float().to(DEV) for t in _dsn_inputs(1, 6, 3))
        logit = torch.randn(1, 6, 3, device=DEV)
        torch.library.opcheck(torch.ops.spikelm.dsn_fused.default,
                              (logit.requires_grad_(), x.requires_grad_(), h0.requires_grad_(), None, 0.25, 4, 1, 2.0, None))
        m = DSN(3).to(DEV)
        st = m.initial_state(2, DEV)
        torch.library.opcheck(torch.ops.spikelm.dsn_step.default,
                              (torch.randn(2, 3, device=DEV), st.conv, st.membrane, m.conv_weight.detach(),
                               m.conv_bias.detach(), 0.25, 4))

    def test_kernel_step_compiles_without_graph_breaks(self, kernels):
        torch._dynamo.reset()
        m = DSN(8).to(DEV)
        w, b = m.conv_weight.detach(), m.conv_bias.detach()

        def decode(xs, state):
            out = []
            for t in range(xs.shape[1]):
                s, state = dsn_step(xs[:, t], w, b, 0.25, 4, state=state, backend="triton")
                out.append(s)
            return torch.stack(out, 1), state

        xs = torch.randn(2, 5, 8, device=DEV) * 3
        got, got_state = torch.compile(decode, fullgraph=True, backend="aot_eager")(xs, m.initial_state(2, DEV))
        want, want_state = decode(xs, m.initial_state(2, DEV))
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_state.membrane, want_state.membrane)
        torch.testing.assert_close(got_state.conv, want_state.conv)

    def test_kernel_dsn_module_compiles_fullgraph_with_autograd(self, kernels):
        # DSN.forward through the fused op traces without a graph break, gradients included
        torch._dynamo.reset()
        m = DSN(8, backend="triton").to(DEV)
        x = (torch.randn(2, 10, 8, device=DEV) * 2).requires_grad_()
        s, st = torch.compile(m, fullgraph=True, backend="aot_eager")(x, return_state=True)
        (s.sum() + st.membrane.sum()).backward()
        got = x.grad.clone()
        x.grad = None
        s2, st2 = m(x, return_state=True)
        (s2.sum() + st2.membrane.sum()).backward()
        torch.testing.assert_close(s, s2)
        torch.testing.assert_close(got, x.grad)
